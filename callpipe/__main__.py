import sys

from callpipe.cli import main

sys.exit(main())
