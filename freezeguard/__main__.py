import sys

from freezeguard.cli import main

sys.exit(main())
