"""``python -m mlx_lm_turboquant <command>``; same as the ``mlx-lm-turboquant`` script."""

from .cli import main

if __name__ == "__main__":
    main()
