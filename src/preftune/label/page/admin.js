// The lead's dashboard: the export's own figures (label export computes the same), refreshed
// every few seconds. Every value is set with textContent.
"use strict";

(function () {
  const REFRESH_MS = 10000;
  const token = new URLSearchParams(window.location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);
  let settingsRead = false;

  function query() {
    const body = {};
    const minAnnotators = $("min-annotators").value.trim();
    const minStrength = $("min-strength").value.trim();
    if (minAnnotators) body.min_annotators = Number(minAnnotators);
    if (minStrength) body.min_strength = Number(minStrength);
    return body;
  }

  async function post(path, body) {
    const response = await fetch("api/admin/" + path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Admin-Token": token },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      let detail = response.status + " " + response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (err) {
        // not JSON: keep the status line
      }
      throw new Error(detail);
    }
    return response;
  }

  const clock = (date) => date.toLocaleTimeString([], { hourCycle: "h23" });
  const fixed = (value, digits) => (value === null || value === undefined ? "-" : value.toFixed(digits));

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }

  function render(data) {
    const report = data.report;
    const overview = data.overview;
    if (!settingsRead) {
      $("min-annotators").value = report.min_annotators;
      settingsRead = true;
    }
    $("items-complete").textContent = overview.complete + " / " + overview.items;
    $("items-remaining").textContent = String(overview.remaining);
    $("exported").textContent = String(report.exported);
    $("alpha").textContent = fixed(report.krippendorff_alpha_symmetric, 3);
    $("alpha-input").textContent = fixed(report.krippendorff_alpha, 3);
    $("observed").textContent = fixed(report.observed_agreement, 3);
    $("left-share").textContent = fixed(report.position_bias.left_share, 3);
    $("mean-margin").textContent = fixed(report.mean_margin, 2);
    $("dropped").textContent =
      "Each item goes to " + overview.annotators_per_item + " annotators; voted on with at least " +
      report.min_annotators + " ratings: " + report.items_rated + " items. Dropped: " + report.dropped_tie +
      " tie majority, " + report.dropped_no_majority + " no majority" +
      (report.min_strength === null ? "" : ", " + report.dropped_weak + " below strength " + report.min_strength +
        ", " + report.dropped_no_strength + " without strength") + ".";
    const body = $("annotators").querySelector("tbody");
    const rows = [];
    for (const [name, work] of Object.entries(overview.annotators)) {
      const agreement = report.annotators[name] || {};
      const row = document.createElement("tr");
      row.dataset.annotator = name;
      cell(row, name);
      cell(row, String(work.judgements));
      cell(row, String(work.ratings));
      cell(row, String(agreement.ties || 0));
      cell(row, String(work.skips));
      cell(row, String(work.comments));
      cell(row, agreement.compared_with_majority ? fixed(agreement.agreement_with_majority, 3) + " of " + agreement.compared_with_majority : "-");
      cell(row, fixed(agreement.left_share, 3));
      cell(row, fixed(work.median_seconds, 1));
      cell(row, String(work.last_hour));
      cell(row, clock(new Date(work.last_answer_at * 1000)));
      rows.push(row);
    }
    body.replaceChildren(...rows);
    $("dashboard").hidden = false;
    $("updated").textContent = "updated " + clock(new Date());
  }

  function fail(err) {
    $("status").textContent = err.message;
    $("status").className = "error";
  }

  async function refresh() {
    try {
      const response = await post("summary", query());
      render(await response.json());
      $("status").textContent = "";
      $("status").className = "";
    } catch (err) {
      fail(err);
    }
  }

  async function download(format) {
    try {
      const response = await post("download", Object.assign({ format }, query()));
      const disposition = response.headers.get("Content-Disposition") || "";
      const match = /filename="([^"]+)"/.exec(disposition);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = match ? match[1] : "labelled";
      document.body.appendChild(link);
      link.click();
      link.remove();
    } catch (err) {
      fail(err);
    }
  }

  $("settings").addEventListener("submit", function (event) {
    event.preventDefault();
    refresh();
  });
  document.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-download]");
    if (button) download(button.dataset.download);
  });

  refresh();
  window.setInterval(refresh, REFRESH_MS);
})();
