"""One module per task; base.py holds the contract every task fulfils."""
