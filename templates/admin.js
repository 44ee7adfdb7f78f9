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

  // Enter in the project field saves, as in a form.
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && ev.target instanceof HTMLElement && ev.target.id === "place-project") {
      ev.preventDefault();
      savePlace();
    }
  });
})();
