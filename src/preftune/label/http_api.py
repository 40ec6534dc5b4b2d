"""The labeling server's HTTP API, in words: one text for `preftune label serve --help` and the
README, kept here (no web packages needed) so the help works without the `label` extra, and
checked against the server's routes by the tests."""

from __future__ import annotations

from preftune.label.store import MAX_COMMENT_LENGTH, MAX_NAME_LENGTH

HTTP_API = f"""\
HTTP API (what the page calls; a script may call it too)
  Every /api/ call is a POST with a JSON object body (Content-Type: application/json); a field the
  call does not know is refused. Answers are JSON; errors are {{"detail": "one line"}} with status
  401 (token missing or wrong), 403 (dashboard off), 404 (unknown item), 409 (answered already,
  not shown to you, nothing to undo, or the item filled up meanwhile), 422 (invalid request) or
  503 (database busy: try again).

Tokens
  X-Label-Token: TOKEN on every annotator call when served with --token (the page reads it from
    the ?token=... of its link); without --token none is asked.
  X-Admin-Token: TOKEN on every /api/admin/ call: the dashboard's own token (--admin-token, or the
    random one printed at start); the annotators' token does not open it.

Annotator calls (NAME: the annotator's name, spaces collapsed, 1-{MAX_NAME_LENGTH} printable characters)
  POST /api/session      {{}}
    -> {{"scale": 3 or 5, "guidelines": the guidelines as HTML, or null}}
  POST /api/next         {{"annotator": NAME}}
    -> {{"item": {{"id", "prompt", "a", "b", "html": {{"prompt", "a", "b"}}}} or null when none is
       left, "progress": PROGRESS}}; a and b are the left and right responses as text, html the
       same rendered; the item is held for this annotator for 30 minutes and comes back the same
       way round if asked again
  POST /api/judgements   {{"annotator": NAME, "item_id": ID, "choice": "A" | "B" | "tie" | "skip",
                          "strength": 1 | 2, "comment": TEXT}}
    -> {{"stored": the judgement's row id, "progress": PROGRESS}}; A is the left response, B the
       right; strength only with --scale 5, required for A and B (1 slightly, 2 much better);
       comment optional, at most {MAX_COMMENT_LENGTH} characters; the same judgement sent twice
       answers with the stored row
  POST /api/undo         {{"annotator": NAME}}
    -> {{"undone": {{"item_id", "choice", "returned"}}, "progress": PROGRESS}}, and "detail" when
       an undone skip's item went to others meanwhile ("returned": false)
  POST /api/progress     {{"annotator": NAME}}
    -> {{"progress": PROGRESS}}
  PROGRESS: {{"done", "skipped", "remaining", "items", "complete", "annotators_per_item"}}

Dashboard calls (X-Admin-Token)
  POST /api/admin/summary    {{"min_annotators": N, "min_strength": S}} (both optional, as in
                             label export)
    -> {{"report": the agreement report, "overview": items and each annotator's counts and pace}}
  POST /api/admin/download   {{"min_annotators": N, "min_strength": S, "format": "jsonl" | "csv" | "report"}}
    -> the export (labelled.jsonl, labelled.csv) or its report (labelled.agreement.json), as a file

Pages (GET): / (annotators), /admin (the dashboard), /static/app.js, /static/admin.js,
/static/style.css.
"""
