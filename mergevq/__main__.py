import sys

from mergevq.cli import main

sys.exit(main())
