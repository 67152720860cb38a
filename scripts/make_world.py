"""Write the synthetic demo world; same as the `rag-make-world` console script.

    python scripts/make_world.py --out outputs/demo_world --seed 0
"""

if __name__ == "__main__":
    from training.demo.world_cli import main

    main()
