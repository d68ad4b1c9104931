"""``python -m server``: run the Retrieve service."""

import sys

from server.app import main

sys.exit(main())
