from xenrun.cli import main

main()
