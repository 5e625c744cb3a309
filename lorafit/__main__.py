import sys

from lorafit.cli import main

sys.exit(main())
