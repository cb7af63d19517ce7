"""A comparison's report: tables, the HTML page, figures and the warnings in words."""

from vilab.inference.report.save import (  # noqa: F401 -- the package's public names
    REPORT_FILES,
    check_report_folder,
    previous_report,
    save_report,
    warnings_for,
    markdown_report,
)

__all__ = ["REPORT_FILES", "check_report_folder", "previous_report", "save_report", "warnings_for", "markdown_report"]
