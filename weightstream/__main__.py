import sys

from weightstream.cli import main

sys.exit(main())
