// The labeling page: asks the server for an item, shows it, sends the answer.
// Every text from the server is set with textContent. The one exception is the Markdown HTML
// the server renders (markdown-it with raw HTML off, links to http(s) only): it is parsed in an
// inert document and moved in, and the page's content policy forbids inline scripts and handlers.
"use strict";

(function () {
  const NAME_KEY = "preftune.annotator";
  const RAW_KEY = "preftune.raw";
  const GUIDELINES_KEY = "preftune.guidelines-read";
  // key -> [choice, strength] for each scale; s, c, u, g and r are the same on both
  const KEYS = {
    3: { "1": ["A", null], "2": ["B", null], t: ["tie", null], s: ["skip", null] },
    5: { "1": ["A", 2], "2": ["A", 1], "3": ["tie", null], t: ["tie", null], "4": ["B", 1], "5": ["B", 2], s: ["skip", null] },
  };
  const token = new URLSearchParams(window.location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);

  let annotator = window.localStorage.getItem(NAME_KEY) || "";
  let item = null;
  let busy = false;
  let session = { scale: 3, guidelines: null };
  let section = "start";

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

  function setHtml(element, html) {
    const doc = new DOMParser().parseFromString(html, "text/html");
    element.replaceChildren(...Array.from(doc.body.childNodes, (node) => document.importNode(node, true)));
  }

  function show(name) {
    section = name;
    for (const id of ["start", "guidelines", "task", "finished"]) $(id).hidden = id !== name;
    $("who").hidden = name === "start";
    // The name box keeps the focus after it is hidden until the browser's next layout, and
    // keys typed in a text box are ignored: let go of it now, so the first key counts.
    if (name !== "start" && $("start").contains(document.activeElement)) document.activeElement.blur();
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
    if (section === "guidelines") return; // the item waits behind the guidelines
    if (!item) {
      show("finished");
      return;
    }
    $("prompt").textContent = item.prompt;
    $("text-a").textContent = item.a;
    $("text-b").textContent = item.b;
    setHtml($("prompt-md"), item.html.prompt);
    setHtml($("md-a"), item.html.a);
    setHtml($("md-b"), item.html.b);
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

  function label(choice, strength) {
    if (choice === "skip") return "skipped";
    if (choice === "tie") return "tie";
    return choice + " is " + (strength === 2 ? "much better" : strength === 1 ? "slightly better" : "better");
  }

  function pendingComment() {
    return $("comment-note").hidden ? "" : $("comment").value.trim();
  }

  function clearComment() {
    $("comment").value = "";
    $("comment-box").hidden = true;
    $("comment-note").hidden = true;
  }

  function choose(choice, strength) {
    if (!item || section !== "task") return;
    const current = item;
    const body = { annotator, item_id: current.id, choice };
    if (strength !== null && strength !== undefined) body.strength = strength;
    const comment = pendingComment();
    if (comment) body.comment = comment;
    return run(async function () {
      await api("judgements", body);
      clearComment();
      const next = await api("next", { annotator });
      // The status changes only once the next item is on screen, so what it says is all done.
      render(next);
      setStatus("Saved: " + label(choice, strength) + (comment ? ", with your comment." : "."), false);
    });
  }

  function undo() {
    return run(async function () {
      const data = await api("undo", { annotator });
      const next = await api("next", { annotator });
      render(next);
      if (data.undone.returned) {
        setStatus("Undone: your last answer (" + label(data.undone.choice, null) + ") is withdrawn.", false);
      } else {
        setStatus("Undone: " + data.detail + ".", false);
      }
    });
  }

  function openComment() {
    if (section !== "task") return;
    $("comment-box").hidden = false;
    $("comment-note").hidden = true;
    $("comment").focus();
  }

  function keepComment() {
    const text = $("comment").value.trim();
    $("comment-box").hidden = true;
    $("comment").blur();
    $("comment-note").hidden = !text;
    $("comment-note").textContent = text ? "Your comment goes with your next answer: " + text : "";
  }

  function setRaw(on) {
    document.body.classList.toggle("raw-mode", on);
    $("raw-toggle").setAttribute("aria-pressed", on ? "true" : "false");
    window.localStorage.setItem(RAW_KEY, on ? "1" : "0");
  }

  function guidelinesKey() {
    // A new text is a new set of guidelines: shown again before the first item.
    let hash = 0;
    for (const ch of session.guidelines || "") hash = (hash * 31 + ch.codePointAt(0)) | 0;
    return GUIDELINES_KEY + ":" + annotator + ":" + hash;
  }

  function toggleGuidelines() {
    if (!session.guidelines) return;
    if (section === "guidelines") {
      window.localStorage.setItem(guidelinesKey(), "1");
      section = "task";
      if (item) render({ item });
      else show("finished");
      $("status").textContent = "";
    } else if (section === "task" || section === "finished") {
      show("guidelines");
    }
  }

  function applySession() {
    const five = session.scale === 5;
    $("choices-3").hidden = five;
    $("choices-5").hidden = !five;
    for (const element of document.querySelectorAll(".needs-guidelines")) element.hidden = !session.guidelines;
    if (session.guidelines) setHtml($("guidelines-text"), session.guidelines);
  }

  function start(name) {
    annotator = name;
    window.localStorage.setItem(NAME_KEY, name);
    $("who-name").textContent = name;
    setStatus("", false);
    return run(async function () {
      session = await api("session", {});
      applySession();
      const data = await api("next", { annotator });
      if (session.guidelines && !window.localStorage.getItem(guidelinesKey())) {
        show("guidelines");
        renderProgress(data.progress);
        item = data.item;
        $("guidelines-done").focus();
      } else {
        section = "task";
        render(data);
      }
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
    if (button.dataset.choice) {
      choose(button.dataset.choice, button.dataset.strength ? Number(button.dataset.strength) : null);
    } else if (button.dataset.action === "undo") undo();
    else if (button.dataset.action === "comment") openComment();
    else if (button.dataset.action === "raw") setRaw(!document.body.classList.contains("raw-mode"));
    else if (button.dataset.action === "guidelines") toggleGuidelines();
  });

  $("comment").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      keepComment();
    } else if (event.key === "Escape") {
      event.preventDefault();
      clearComment();
      $("comment").blur();
    }
  });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement) return;
    if (!$("start").hidden) return;
    const key = event.key.toLowerCase();
    const pick = KEYS[session.scale][key];
    if (pick && item && section === "task") {
      event.preventDefault();
      choose(pick[0], pick[1]);
    } else if (key === "u" && section !== "guidelines") {
      event.preventDefault();
      undo();
    } else if (key === "c") {
      event.preventDefault();
      openComment();
    } else if (key === "r") {
      event.preventDefault();
      setRaw(!document.body.classList.contains("raw-mode"));
    } else if (key === "g" || (key === "enter" && section === "guidelines")) {
      event.preventDefault();
      toggleGuidelines();
    }
  });

  setRaw(window.localStorage.getItem(RAW_KEY) === "1");
  if (annotator) {
    start(annotator);
  } else {
    show("start");
    $("name").focus();
  }
})();
