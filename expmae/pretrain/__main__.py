"""``python -m expmae.pretrain`` / ``accelerate launch -m expmae.pretrain``: see expmae.pretrain.cli."""
import sys

from expmae.pretrain.cli import main

sys.exit(main())
