import sys

from assignments.nbgrade import main

sys.exit(main())
