"""`python -m lorafit`: the CLI, and a quiet end however often Ctrl-C is pressed."""

import os
import signal
import sys


def run(argv=None) -> None:
    try:
        from lorafit.cli import main  # start-up: inside the try, so a Ctrl-C during the imports ends quietly too

        code = main(argv)
    except KeyboardInterrupt:  # e.g. during the imports, before main can catch it
        code = 130
    # The work is done or abandoned: a Ctrl-C while the interpreter shuts down (threads, atexit) ends the
    # process at once, instead of printing a traceback from wherever it landed.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    sys.exit(code)


if __name__ == "__main__":
    run()
