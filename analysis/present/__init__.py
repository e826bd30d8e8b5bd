"""How the report shows what :mod:`analysis.compute` computed: tables (text, Markdown, CSV, LaTeX) with their notes,
plots, the HTML page and report.md. Imports point down to ``analysis.compute`` (and ``studies``/``dset``), never up
to ``analysis.make_report``."""



