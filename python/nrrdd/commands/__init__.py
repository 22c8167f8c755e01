"""One module per ``nrrdd`` subcommand: argument parsing and orchestration only."""
