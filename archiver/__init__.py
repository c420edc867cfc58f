"""The archiver stage (consumer group `archiver`): every record of the archived topics into the run log."""
