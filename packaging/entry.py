"""Entry point of the frozen `edgediff` executable (PyInstaller runs this file as __main__)."""

import sys

from edgediff.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
