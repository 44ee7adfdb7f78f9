// gemgate admin pages: the buttons call the admin JSON API with the session's CSRF token,
// then show the answer and reload the page. No framework, nothing fetched from elsewhere.
(function () {
  "use strict";
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function show(text, failed) {
    var out = document.getElementById("result");
    if (out) { out.textContent = text; out.className = failed ? "result error" : "result"; }
  }

  function call(method, path, body) {
    var opts = { method: method, credentials: "same-origin",
                 headers: { "x-csrf-token": csrf, "accept": "application/json" } };
    if (body !== undefined) {
      opts.headers["content-type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(path, opts).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (v) {
        if (!r.ok) { throw new Error((v.error && v.error.message) || ("HTTP " + r.status)); }
        return v;
      });
    });
  }

  function thenReload(promise, what) {
    promise.then(function (v) {
      show(what + ": done. " + summary(v));
      setTimeout(function () { location.reload(); }, 400);
    }).catch(function (e) { show(what + " failed: " + e.message, true); });
  }

  function summary(v) {
    if (v.results) {
      var ok = v.results.filter(function (r) { return r.ok; }).length;
      return ok + " of " + v.results.length + " keys answered well.";
    }
    if (v.added) { return v.added.length + " added, " + v.duplicates.length + " already in the pool."; }
    if (v.done) { return v.done.length + " keys." + (v.env_only && v.env_only.length ? " " + v.env_only.length + " come from API_KEYS and stay." : ""); }
    if (v.deleted !== undefined) { return "deleted " + v.deleted + "."; }
    if (v.project !== undefined) {
      return v.id + ": " + (v.project ? "project " + v.project : "its own project") + (v.tier ? ", tier " + v.tier : ", no tier") + ".";
    }
    return "";
  }

  function picked() {
    return Array.prototype.map.call(document.querySelectorAll("input.pick:checked"), function (c) { return c.value; });
  }

  function copy(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    var area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(area); }
    return Promise.resolve();
  }

  // The project dialog: which key it is for, filled from the key's row.
  function openPlace(id, button) {
    var dialog = document.getElementById("place-dialog");
    if (!dialog) { return; }
    dialog.setAttribute("data-id", id);
    document.getElementById("place-key").textContent = id;
    document.getElementById("place-project").value = button.getAttribute("data-project") || "";
    document.getElementById("place-tier").value = button.getAttribute("data-tier") || "";
    dialog.showModal();
    document.getElementById("place-project").focus();
  }

  function savePlace() {
    var dialog = document.getElementById("place-dialog");
    var id = dialog.getAttribute("data-id");
    var project = document.getElementById("place-project").value.trim();
    var tier = document.getElementById("place-tier").value;
    dialog.close();
    thenReload(call("PATCH", "/admin/api/keys/" + id, { project: project || null, tier: tier || null }), "Project");
  }

  document.addEventListener("click", function (ev) {
    var t = ev.target;
    if (!(t instanceof HTMLElement)) { return; }
    var row = t.closest("tr[data-id]");
    var act = t.getAttribute("data-act");
    if (row && act) {
      var id = row.getAttribute("data-id");
      if (act === "copy") {
        copy(t.getAttribute("data-copy")).then(function () { show("Copied " + id + " (masked: keys never leave the gateway in clear)."); });
      } else if (act === "place") {
        openPlace(id, t);
      } else if (act === "delete") {
        if (confirm("Delete key " + id + " from the config file?")) { thenReload(call("DELETE", "/admin/api/keys/" + id), "Delete"); }
      } else {
        thenReload(call("POST", "/admin/api/keys/" + id + "/" + act), act);
      }
      return;
    }
    switch (t.id) {
      case "place-save":
        savePlace();
        break;
      case "place-cancel":
        document.getElementById("place-dialog").close();
        break;
      case "select-all":
        Array.prototype.forEach.call(document.querySelectorAll("input.pick"), function (c) { c.checked = t.checked; });
        break;
      case "bulk-apply": {
        var ids = picked();
        var action = document.getElementById("bulk-action").value;
        if (!ids.length) { show("Select keys first.", true); break; }
        if (action === "delete" && !confirm("Delete " + ids.length + " keys from the config file?")) { break; }
        if (action === "verify") { thenReload(call("POST", "/admin/api/keys/verify", { ids: ids }), "Verify"); }
        else { thenReload(call("POST", "/admin/api/keys/bulk", { action: action, ids: ids }), action); }
        break;
      }
      case "import": {
        var text = document.getElementById("import-text").value;
        thenReload(call("POST", "/admin/api/keys", { text: text }), "Import");
        break;
      }
      case "reload":
        thenReload(call("POST", "/admin/api/reload"), "Reload");
        break;
      case "logs-delete": {
        var rows = picked();
        if (!rows.length) { show("Select entries first.", true); break; }
        thenReload(call("DELETE", "/admin/api/logs/" + t.getAttribute("data-log"), { rows: rows }), "Delete");
        break;
      }
      case "logs-delete-all":
        if (confirm("Delete every entry of this log?")) {
          thenReload(call("DELETE", "/admin/api/logs/" + t.getAttribute("data-log") + "?all=true"), "Delete");
        }
        break;
    }
  });

  // The plugin editor: a textarea with a line-number gutter; the failing lines of a check are
  // marked in the gutter.
  function gutter(bad) {
    var code = document.getElementById("editor-code");
    var g = document.getElementById("editor-gutter");
    if (!code || !g) { return; }
    var n = code.value.split("\n").length;
    g.textContent = "";
    for (var i = 1; i <= n; i++) {
      var line = document.createElement("span");
      line.textContent = i + "\n";
      if (bad && bad[i]) { line.className = "bad"; line.title = bad[i]; }
      g.appendChild(line);
    }
    code.rows = Math.max(24, n + 1);
  }

  function fileName() { return document.getElementById("editor-file").value; }

  function openFile(name) {
    var select = document.getElementById("editor-file");
    if (name) { select.value = name; }
    call("GET", "/admin/api/plugins/" + encodeURIComponent(fileName())).then(function (v) {
      document.getElementById("editor-code").value = v.code;
      gutter();
      editorSays((v.file || "built in") + (v.editable ? "" : " (read only)"), false);
      document.getElementById("editor-section").scrollIntoView();
    }).catch(function (e) { editorSays("Open failed: " + e.message, true); });
  }

  function editorSays(text, failed) {
    var out = document.getElementById("editor-result");
    out.textContent = text;
    out.className = failed ? "result error" : "result";
  }

  // What a check or save found: whether the plugins load (with the error's line), and every
  // failing test with its file and line.
  function checked(v) {
    var bad = {}, lines = [], mine = "/" + fileName() + ".lua:";
    if (!v.loads) {
      lines.push("Does not load: " + v.error);
      if (v.line) { bad[v.line] = v.error; }
    } else {
      lines.push("Loads. Tests: " + v.passed + " passed, " + v.failed + " failed.");
    }
    (v.tests && v.tests.results || []).forEach(function (r) {
      if (!r.failure) { return; }
      lines.push("FAIL " + r.name + ": " + r.failure);
      var at = r.failure.indexOf(mine);
      if (at >= 0) {
        var n = parseInt(r.failure.slice(at + mine.length), 10);
        if (n) { bad[n] = r.failure; }
      }
    });
    if (v.saved !== undefined) {
      lines.push(v.saved ? "Saved; reload " + (v.reload && v.reload.ok ? "done (generation " + v.reload.generation + ")." : "failed: " + JSON.stringify(v.reload && v.reload.error)) : "Not saved.");
    }
    gutter(bad);
    editorSays(lines.join("\n"), !v.loads || v.failed > 0 || v.saved === false);
  }

  function dryRun() {
    var request = {
      model: document.getElementById("dry-model").value,
      action: document.getElementById("dry-action").value,
      protocol: document.getElementById("dry-protocol").value,
      client: document.getElementById("dry-client").value,
      stream: document.getElementById("dry-stream").checked
    };
    var out = document.getElementById("dry-result");
    try {
      request.headers = JSON.parse(document.getElementById("dry-headers").value || "{}");
      var body = document.getElementById("dry-body").value.trim();
      if (body) { request.body = JSON.parse(body); }
    } catch (e) { out.textContent = "Not JSON: " + e.message; out.className = "result error"; return; }
    call("POST", "/admin/api/policy/dry-run", { request: request }).then(function (v) {
      var head = v.denied ? "Denied " + v.denied.status + ": " + v.denied.message
        : "Model " + v.model + ", key " + (v.key ? v.key + " (by " + v.chosen_by + ")" : "none: " + v.no_key);
      out.textContent = head + "\n\n" + JSON.stringify(v, null, 2);
      out.className = "result";
    }).catch(function (e) { out.textContent = "Dry run failed: " + e.message; out.className = "result error"; });
  }

  document.addEventListener("click", function (ev) {
    var t = ev.target;
    if (!(t instanceof HTMLElement)) { return; }
    if (t.classList.contains("open-file")) { openFile(t.getAttribute("data-file")); return; }
    var code = document.getElementById("editor-code");
    switch (t.id) {
      case "editor-open": openFile(); break;
      case "editor-check":
        call("POST", "/admin/api/plugins/" + encodeURIComponent(fileName()) + "/check", { code: code.value })
          .then(checked).catch(function (e) { editorSays("Check failed: " + e.message, true); });
        break;
      case "editor-save":
        call("PUT", "/admin/api/plugins/" + encodeURIComponent(fileName()), { code: code.value })
          .then(checked).catch(function (e) { editorSays("Save failed: " + e.message, true); });
        break;
      case "dry-run": dryRun(); break;
    }
  });
  document.addEventListener("input", function (ev) {
    if (ev.target instanceof HTMLElement && ev.target.id === "editor-code") { gutter(); }
  });

  // Enter in the project field saves, as in a form.
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && ev.target instanceof HTMLElement && ev.target.id === "place-project") {
      ev.preventDefault();
      savePlace();
    }
  });
})();
