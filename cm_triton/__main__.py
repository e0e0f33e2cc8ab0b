from cm_triton.demo import main

main()
