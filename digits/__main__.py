import sys

from digits.cli import main

sys.exit(main())
