import os
import sys

# Benchmarks share the tests' builders; the interpreter is never on here (it would time Python).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
