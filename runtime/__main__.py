import sys

from runtime.shell.cli import main

sys.exit(main())
