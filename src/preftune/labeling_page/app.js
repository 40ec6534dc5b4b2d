// The labeling page: asks the server for an item, shows it, sends the answer.
// Every text from the server is set with textContent, never parsed as HTML.
"use strict";

(function () {
  const NAME_KEY = "preftune.annotator";
  const KEYS = { "1": "A", "2": "B", t: "tie", s: "skip" };
  const token = new URLSearchParams(window.location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);

  let annotator = window.localStorage.getItem(NAME_KEY) || "";
  let item = null;
  let busy = false;

  async function api(path, body) {
    const headers = { "Content-Type": "application/json" };
    if (token) headers["X-Label-Token"] = token;
    const response = await fetch("api/" + path, { method: "POST", headers, body: JSON.stringify(body) });
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const error = new Error((data && data.detail) || response.status + " " + response.statusText);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function show(section) {
    for (const id of ["start", "task", "finished"]) $(id).hidden = id !== section;
    $("who").hidden = section === "start";
    // The name box keeps the focus after it is hidden until the browser's next layout, and
    // keys typed in a text box are ignored: let go of it now, so the first key counts.
    if (section !== "start" && $("start").contains(document.activeElement)) document.activeElement.blur();
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  function renderProgress(progress) {
    if (!progress) return;
    $("progress").textContent =
      progress.done + " done \u00b7 " + progress.remaining + " remaining \u00b7 " +
      progress.complete + "/" + progress.items + " items complete";
  }

  function render(data) {
    renderProgress(data.progress);
    item = data.item;
    if (!item) {
      show("finished");
      return;
    }
    $("prompt").textContent = item.prompt;
    $("text-a").textContent = item.a;
    $("text-b").textContent = item.b;
    show("task");
  }

  async function run(action) {
    if (busy) return;
    busy = true;
    try {
      await action();
    } catch (err) {
      setStatus(err.message, true);
      if (err.status === 409) {
        try {
          render(await api("next", { annotator }));
        } catch (again) {
          setStatus(again.message, true);
        }
      }
    } finally {
      busy = false;
    }
  }

  const LABELS = { A: "A is better", B: "B is better", tie: "tie", skip: "skipped" };

  function choose(choice) {
    if (!item) return;
    const current = item;
    return run(async function () {
      await api("judgements", { annotator, item_id: current.id, choice });
      const next = await api("next", { annotator });
      // The status changes only once the next item is on screen, so what it says is all done.
      render(next);
      setStatus("Saved: " + LABELS[choice] + ".", false);
    });
  }

  function undo() {
    return run(async function () {
      const data = await api("undo", { annotator });
      const next = await api("next", { annotator });
      render(next);
      setStatus("Undone: your last answer (" + LABELS[data.undone.choice] + ") is withdrawn.", false);
    });
  }

  function start(name) {
    annotator = name;
    window.localStorage.setItem(NAME_KEY, name);
    $("who-name").textContent = name;
    setStatus("", false);
    return run(async function () {
      render(await api("next", { annotator }));
    });
  }

  $("start-form").addEventListener("submit", function (event) {
    event.preventDefault();
    const name = $("name").value.trim();
    if (name) start(name);
  });

  $("change-name").addEventListener("click", function () {
    item = null;
    $("name").value = annotator;
    show("start");
    $("name").focus();
  });

  document.addEventListener("click", function (event) {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.dataset.choice) choose(button.dataset.choice);
    else if (button.dataset.action === "undo") undo();
  });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target instanceof HTMLInputElement || !$("start").hidden) return;
    const key = event.key.toLowerCase();
    if (KEYS[key] && item) {
      event.preventDefault();
      choose(KEYS[key]);
    } else if (key === "u") {
      event.preventDefault();
      undo();
    }
  });

  if (annotator) {
    start(annotator);
  } else {
    show("start");
    $("name").focus();
  }
})();
