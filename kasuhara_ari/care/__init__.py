"""Care for agents (issue 18): the recovery pause after a harassment call, the monthly exposure report
with follow-up notes, and its SVG chart."""
