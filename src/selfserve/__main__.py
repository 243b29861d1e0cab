from selfserve.cli import main

main()
