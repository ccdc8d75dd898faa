// The live board: rows from the console's server-sent events (/board/stream). No framework, no eval, no
// innerHTML: every string from the server is written with textContent (caller names are hostile input).
// The server already masks a viewer's caller numbers; this script only shows what it was sent.
"use strict";

(function () {
  const table = document.getElementById("board");
  if (!table) {
    return;
  }
  const texts = JSON.parse(table.dataset.texts || "{}");
  const rows = document.getElementById("board-rows");
  const empty = document.getElementById("board-empty");
  const conn = document.getElementById("board-conn");
  const banner = document.getElementById("board-banner");
  const notice = document.getElementById("board-notice");
  const count = document.getElementById("board-count");
  const sound = document.getElementById("board-sound");
  const mayJoin = table.dataset.join === "yes";
  const csrf = table.dataset.csrf;
  const SOUND_KEY = "kasuhara.board.sound";
  const calls = new Map(); // call_id -> row data from the server
  let serverOffsetMs = 0; // server clock minus ours: durations tick from the server's started_at
  let source = null;
  let ended = false;
  let service = { state: "unknown", broker: true };

  function text(key, fallback) {
    return Object.prototype.hasOwnProperty.call(texts, key) ? texts[key] : fallback;
  }

  function el(tag, className, content) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (content !== undefined) {
      node.textContent = content;
    }
    return node;
  }

  function duration(call) {
    if (!call.started_at) {
      return "-";
    }
    const started = Date.parse(call.started_at);
    if (Number.isNaN(started)) {
      return "-";
    }
    const seconds = Math.max(0, Math.floor((Date.now() + serverOffsetMs - started) / 1000));
    const h = Math.floor(seconds / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    const s = String(seconds % 60).padStart(2, "0");
    return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
  }

  // --- sound: off unless the user switched it on (remembered in this browser) ------------------------
  let audio = null;
  function beep() {
    if (!sound || !sound.checked) {
      return;
    }
    try {
      audio = audio || new AudioContext();
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.frequency.value = 880;
      gain.gain.setValueAtTime(0.2, audio.currentTime);
      gain.gain.exponentialRampToValueAtTime(0.001, audio.currentTime + 0.6);
      osc.connect(gain).connect(audio.destination);
      osc.start();
      osc.stop(audio.currentTime + 0.6);
    } catch (e) {
      // No audio device: the colour still draws attention.
    }
  }
  if (sound) {
    try {
      sound.checked = window.localStorage.getItem(SOUND_KEY) === "on";
    } catch (e) {
      sound.checked = false;
    }
    sound.addEventListener("change", () => {
      try {
        window.localStorage.setItem(SOUND_KEY, sound.checked ? "on" : "off");
      } catch (e) {
        // storage refused (private mode): the choice lasts for this page only
      }
      if (sound.checked) {
        beep(); // also unlocks audio: the click is the user gesture browsers require
      }
    });
  }

  // --- rows ------------------------------------------------------------------------------------------
  function joinButtons(call) {
    const cell = el("td", "actions");
    for (const mode of ["listen", "whisper", "barge"]) {
      const button = el("button", `join join-${mode}`, text(`join_${mode}`, mode));
      button.type = "button";
      button.dataset.mode = mode;
      button.dataset.callId = call.call_id;
      cell.appendChild(button);
    }
    return cell;
  }

  function render(call) {
    const tr = el("tr", "call");
    tr.dataset.callId = call.call_id;
    tr.dataset.state = call.state;
    tr.dataset.at = call.at || "";
    tr.dataset.sent = call.sent || "";
    tr.dataset.badges = call.badges.join(" ");
    if (call.alert) {
      tr.classList.add("alert");
    }
    tr.appendChild(el("td", `state state-${call.state}`, text(`state_${call.state}`, call.state)));
    const caller = el("td", "caller");
    caller.appendChild(el("span", "number", call.caller_number || "-"));
    if (call.caller_name) {
      caller.appendChild(el("span", "name", call.caller_name));
    }
    tr.appendChild(caller);
    tr.appendChild(el("td", "direction", call.direction ? text(`dir_${call.direction}`, call.direction) : "-"));
    tr.appendChild(el("td", "agent", call.agent || "-"));
    const dur = el("td", "duration", duration(call));
    tr.appendChild(dur);
    const badges = el("td", "badges");
    for (const badge of call.badges) {
      badges.appendChild(el("span", `badge badge-${badge}`, text(`badge_${badge}`, badge)));
    }
    if (call.supervision) {
      badges.appendChild(el("span", "badge badge-supervision", text(`join_${call.supervision}`, call.supervision)));
    }
    tr.appendChild(badges);
    if (mayJoin) {
      tr.appendChild(joinButtons(call));
    }
    return tr;
  }

  function order(a, b) {
    if (a.alert !== b.alert) {
      return a.alert ? -1 : 1;
    }
    return (a.started_at || "").localeCompare(b.started_at || "");
  }

  function redraw() {
    const sorted = Array.from(calls.values()).sort(order);
    const fresh = sorted.map(render);
    rows.replaceChildren(...fresh);
    empty.hidden = sorted.length > 0;
    count.textContent = sorted.length ? `${sorted.length} ${text("board_calls", "")}` : "";
  }

  function tick() {
    for (const tr of rows.children) {
      const call = calls.get(tr.dataset.callId);
      const cell = tr.querySelector(".duration");
      if (call && cell) {
        cell.textContent = duration(call);
      }
    }
  }
  setInterval(tick, 1000);

  function rowOf(callId) {
    for (const tr of rows.children) {
      if (tr.dataset.callId === callId) {
        return tr;
      }
    }
    return null;
  }

  function put(call) {
    const before = calls.get(call.call_id);
    const newAlert = call.alert && !(before && before.alert);
    calls.set(call.call_id, call);
    const tr = before ? rowOf(call.call_id) : null;
    if (tr && before.alert === call.alert && before.started_at === call.started_at) {
      tr.replaceWith(render(call)); // same place in the order: only this row changes
    } else {
      redraw();
    }
    if (newAlert) {
      beep();
    }
  }

  // --- connection state ------------------------------------------------------------------------------
  function showConn(state, label) {
    conn.dataset.state = state;
    conn.textContent = label;
    table.classList.toggle("stale", state !== "live");
  }

  function showService() {
    let message = "";
    if (!service.broker) {
      message = text("board_broker_lost", "");
    } else if (service.state === "offline") {
      message = text("board_service_offline", "");
    }
    banner.textContent = message;
    banner.hidden = !message;
  }

  function sessionEnded() {
    ended = true;
    if (source) {
      source.close();
    }
    showConn("ended", text("board_session_ended", ""));
    const link = el("a", "relogin", text("board_relogin", "login"));
    link.href = "/login?next=/";
    conn.appendChild(document.createTextNode(" "));
    conn.appendChild(link);
  }

  function connect() {
    source = new EventSource("/board/stream");
    source.addEventListener("open", () => showConn("live", text("board_live", "live")));
    source.addEventListener("snapshot", (e) => {
      const data = JSON.parse(e.data);
      serverOffsetMs = Date.parse(data.now) - Date.now() || 0;
      calls.clear();
      for (const call of data.calls) {
        calls.set(call.call_id, call);
      }
      service = data.service;
      showService();
      showPauses(data.pauses || []);
      redraw();
      showConn("live", text("board_live", "live"));
      if (data.calls.some((c) => c.alert)) {
        beep();
      }
    });
    source.addEventListener("call", (e) => put(JSON.parse(e.data)));
    source.addEventListener("gone", (e) => {
      calls.delete(JSON.parse(e.data).call_id);
      redraw();
    });
    source.addEventListener("pauses", (e) => showPauses(JSON.parse(e.data).pauses));
    source.addEventListener("service", (e) => {
      service = JSON.parse(e.data);
      showService();
    });
    source.addEventListener("end", (e) => {
      if (JSON.parse(e.data).reason === "role") {
        source.close(); // another role: what this page may see changed; a new stream says what
        connect();
      } else {
        sessionEnded();
      }
    });
    source.addEventListener("error", () => {
      if (ended) {
        return;
      }
      showConn("lost", text("board_lost", "connection lost"));
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream (401 after the session ended, 503): find out which, then retry.
        fetch("/", { redirect: "manual", credentials: "same-origin" })
          .then((r) => {
            if (r.type === "opaqueredirect" || r.status === 401) {
              sessionEnded();
            } else {
              setTimeout(connect, 5000);
            }
          })
          .catch(() => setTimeout(connect, 5000));
      }
    });
  }

  // --- joining a call (supervisor, admin): the server checks the role and the CSRF token again ---------
  rows.addEventListener("click", (e) => {
    const button = e.target.closest("button.join");
    if (!button) {
      return;
    }
    const body = new URLSearchParams({ csrf, call_id: button.dataset.callId, mode: button.dataset.mode });
    button.disabled = true;
    fetch("/board/join", { method: "POST", body, credentials: "same-origin" })
      .then((r) => r.json().catch(() => ({ ok: false, message: text("join_failed", "failed") })))
      .then((answer) => {
        notice.textContent = answer.message || text("join_failed", "failed");
        notice.hidden = false;
        notice.classList.toggle("error", !answer.ok);
      })
      .catch(() => {
        notice.textContent = text("join_failed", "failed");
        notice.hidden = false;
      })
      .finally(() => {
        button.disabled = false;
      });
  });

  // --- agents in a recovery pause (care): a panel of their own, agents are not calls ---------------------
  const pausePanel = document.getElementById("pauses");
  const pauseRows = document.getElementById("pause-rows");
  const mayResume = pausePanel && pausePanel.dataset.resume === "yes";

  function clock(iso) {
    const at = Date.parse(iso || "");
    return Number.isNaN(at) ? "-" : new Date(at).toLocaleTimeString();
  }

  function showPauses(pauses) {
    if (!pausePanel) {
      return;
    }
    const fresh = pauses.map((p) => {
      const tr = el("tr", "pause");
      tr.dataset.agent = p.agent;
      const who = el("td", "agent", p.agent);
      who.appendChild(document.createTextNode(" "));
      who.appendChild(el("span", "badge badge-pause", text("pause_badge", "pause")));
      tr.appendChild(who);
      tr.appendChild(el("td", "person", p.person || "-"));
      tr.appendChild(el("td", "until", clock(p.until)));
      if (mayResume) {
        const cell = el("td", "actions");
        const button = el("button", "resume", text("pause_resume", "resume"));
        button.type = "button";
        button.dataset.agent = p.agent;
        cell.appendChild(button);
        tr.appendChild(cell);
      }
      return tr;
    });
    pauseRows.replaceChildren(...fresh);
    pausePanel.hidden = fresh.length === 0;
  }

  if (pausePanel) {
    pauseRows.addEventListener("click", (e) => {
      const button = e.target.closest("button.resume");
      if (!button) {
        return;
      }
      const body = new URLSearchParams({ csrf, agent: button.dataset.agent });
      button.disabled = true;
      fetch("/care/resume", { method: "POST", body, credentials: "same-origin" })
        .then((r) => r.json().catch(() => ({ ok: false, message: text("pause_failed", "failed") })))
        .then((answer) => {
          notice.textContent = answer.message || text("pause_failed", "failed");
          notice.hidden = false;
          notice.classList.toggle("error", !answer.ok);
        })
        .catch(() => {
          notice.textContent = text("pause_failed", "failed");
          notice.hidden = false;
        })
        .finally(() => {
          button.disabled = false;
        });
    });
  }

  connect();
})();
