"""Short examples to copy: each imports everything from the installed package."""
