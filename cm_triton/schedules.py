"""Coefficient schedules of the iterative primitives (spec §2).

Kept apart from the math so options, reference and kernels share one copy.
"""

from __future__ import annotations

# Polar Express, 8 steps, for msign: X <- a X + (b A + c A A) X with A = X X^T.  [release]
POLAR_EXPRESS_8: tuple[tuple[float, float, float], ...] = (
    (8.2051, -22.9019, 16.4607),
    (4.0664, -2.8612, 0.5184),
    (3.9096, -2.8234, 0.5250),
    (3.2856, -2.4153, 0.4853),
    (2.2779, -1.6198, 0.3985),
    (1.8726, -1.2307, 0.3585),
    (1.8564, -1.2132, 0.3568),
    (1.8750, -1.2500, 0.3750),
)

# Polar Express, 5 steps (safety factor 2e-2, as modded-nanogpt's Muon and microsoft/dion run it;
# the Polar Express paper's construction, arXiv 2505.16932).
POLAR_EXPRESS_5: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# The Muon groups' schedule where neither the group nor the optimizer names one (the CM legs
# keep POLAR_EXPRESS_8): torch.optim.Muon, dion and modded-nanogpt take five steps. Chosen by
# measurement: bench/results/muon_schedule.md (accuracy against float64, whole-model step time,
# and the demo's loss).
MUON_COEFFICIENTS = POLAR_EXPRESS_5

# Muon's classic quintic, five steps (KellerJordan/Muon).
MUON_CLASSIC_5: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 5

# Coupled Newton-Schulz for A^{-1/2}: 9 tuned pairs, then 16 x (1.5, -0.5).  [release]
INV_SQRT_NEWTON: tuple[tuple[float, float], ...] = (
    (5.182503604966906, -5.178098480082684),
    (2.586120737395915, -0.6479542005271643),
    (2.567364126726186, -0.6454968804392178),
    (2.520560084348265, -0.6393528082067044),
    (2.410759275435182, -0.6248683598710716),
    (2.1883348130094173, -0.5952022073798908),
    (1.8595760874873613, -0.5504490972723968),
    (1.589020160467417, -0.5126569802066718),
    (1.5051653981684994, -0.5007377068751799),
) + ((1.5, -0.5),) * 16

# Coupled Newton-Schulz for A^{-1/2} with quintic steps q(P) = a + b P + c P^2: on the square
# roots of the eigenvalues this is msign's own iteration, so Polar Express's first six steps
# (designed for singular values in [1e-3, 1]) followed by one classic quintic step (cubic
# convergence to 1) reach the 25-step schedule's accuracy in 7 steps: 28 products, not 75.
# Measured (fp32, n = 16..128, condition 1e2..1e6): ||Z A Z - I||_rms equal to the 25-step
# schedule's to within rounding (bench/results/accuracy.md).
INV_SQRT_QUINTIC: tuple[tuple[float, float, float], ...] = POLAR_EXPRESS_8[:6] + (
    (1.875, -1.25, 0.375),
)
