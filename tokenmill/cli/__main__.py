from tokenmill.cli.app import main

main()
