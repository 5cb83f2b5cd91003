"""The cifar-dist command: its subcommands and doctor."""
