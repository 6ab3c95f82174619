"""The bottom of our packages: files that appear whole or not at all (local or gs://), the errors we
report to users, and how command-line tools report them. Imports nothing else of ours."""
