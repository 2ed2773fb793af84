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
