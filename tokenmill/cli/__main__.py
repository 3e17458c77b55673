from tokenmill.workers.preload import start_from_env

start_from_env()  # a local worker's model loads on a thread while the CLI is imported (workers/preload.py)

from tokenmill.cli.app import main  # noqa: E402

main()
