// Behaviours every page shares, declared with data attributes: the Content-Security-Policy
// refuses inline handlers (onsubmit=, onclick=), so they live here. Listeners sit on the
// document, so they also serve content that htmx swaps in.
(function () {
  "use strict";

  // <form data-confirm="Delete this run?">: ask before submitting; Cancel keeps everything.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });

  // <input data-select-on-focus>: a click or a Tab selects the whole value, ready to copy.
  function selectAll(event) {
    const input = event.target;
    if (input instanceof HTMLInputElement && input.hasAttribute("data-select-on-focus")) {
      input.select();
    }
  }
  document.addEventListener("focusin", selectAll);
  document.addEventListener("click", selectAll);

  // <button data-copy="ID">: copies the value of the field #ID (a share, token or
  // invitation link) and says so on the button. The clipboard API needs a secure page
  // (https, or localhost); on plain http the field is selected and copied the old way.
  document.addEventListener("click", async (event) => {
    const button = event.target instanceof Element && event.target.closest("button[data-copy]");
    const field = button && document.getElementById(button.dataset.copy);
    if (!field) return;
    let copied = false;
    try {
      await navigator.clipboard.writeText(field.value);
      copied = true;
    } catch (error) {
      field.select();
      copied = document.execCommand("copy");
    }
    tell(button, copied ? "Copied" : "Press Ctrl+C to copy");
  });

  function tell(button, words) {
    const label = button.dataset.label || (button.dataset.label = button.textContent);
    button.textContent = words;
    window.setTimeout(() => { button.textContent = label; }, 2000);
  }

  // <div data-once>: a flash that tells what just happened ("Run … launched"). Back and
  // Forward show a page as it was, from the browser's caches, and would tell it again as if
  // it had just happened; the live parts of the page say what is true now.
  window.addEventListener("pageshow", (event) => {
    const navigation = performance.getEntriesByType("navigation")[0];
    if (event.persisted || (navigation && navigation.type === "back_forward")) {
      document.querySelectorAll("[data-once]").forEach((element) => element.remove());
    }
  });
})();
