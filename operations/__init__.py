"""Operating a run: publishing prompt files, the run-log archiver, replays, scaling
local workers and the status view. Each module is one capability behind a `primerl`
subcommand (registered in `operations/commands.py`)."""
