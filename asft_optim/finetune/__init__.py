"""`asft finetune`: fine-tune real checkpoints with SFT, L2-SP and AsFT and measure HS and FA.

    training.py  one `transformers.Trainer` path for every method; data, model loading and saving
    cli.py       the command: inputs checked, runs, re-evaluation of the saved models, drift
    report.py    table.md, drift.md, drift.png
"""
