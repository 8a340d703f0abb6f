from lkrun.cli import main

main()
