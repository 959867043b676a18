// Content Mover console: live updates over Server-Sent Events. Every page is complete without
// this script (reload to see changes); with it, each event refreshes the page's live sections
// (`data-live`) in place, leaving forms as the operator left them.
(function () {
  "use strict";
  var badge = document.getElementById("live");
  var pending = null;
  function refresh() {
    pending = null;
    fetch(location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok && !r.redirected ? r.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (el) {
          var next = fresh.getElementById(el.id);
          if (next) { el.innerHTML = next.innerHTML; }
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () {});
  }
  function soon() {
    if (!pending) { pending = setTimeout(refresh, 250); }
  }
  function connect() {
    var es = new EventSource("/console/events");
    es.onopen = function () { badge.textContent = "live"; badge.className = "live on"; };
    es.onerror = function () { badge.textContent = "reconnecting"; badge.className = "live off"; };
    ["job", "run", "report", "segment", "server", "site", "history"].forEach(function (k) {
      es.addEventListener(k, soon);
    });
    // Fell behind: the manager dropped this stream. Start over from the page's current state.
    es.addEventListener("lagged", function () { es.close(); refresh(); setTimeout(connect, 1000); });
  }
  if (window.EventSource && badge) { connect(); }
})();
