import sys

from diffkd.train.command import main

sys.exit(main())
