"""`python -m com4d.segment VIDEO --prompts prompts.json --sam CKPT --out DIR`."""

import sys

from com4d.segment.cli import main

if __name__ == "__main__":
    sys.exit(main())
