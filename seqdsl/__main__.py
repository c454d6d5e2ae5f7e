import sys

from seqdsl.cli import main

sys.exit(main())
