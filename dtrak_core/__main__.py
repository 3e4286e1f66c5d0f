import sys

from dtrak_core.cli import main

sys.exit(main())
