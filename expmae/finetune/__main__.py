"""``python -m expmae.finetune ...`` = ``expmae-finetune ...``."""
from expmae.finetune.cli import main

raise SystemExit(main())
