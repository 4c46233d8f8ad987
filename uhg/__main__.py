import sys

from uhg.cli import main

sys.exit(main())
