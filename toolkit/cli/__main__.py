from toolkit.cli.main import cli

cli(prog_name="toolkit")
