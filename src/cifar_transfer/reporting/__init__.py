"""Stage 5, reporting: figures, report.md / report.html, and runs compared side by side."""
