import sys

from kvverify.cli import main

sys.exit(main())
