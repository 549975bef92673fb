"""The second scenario (issue 13.6): the same stock machine with systemd-networkd in
charge of its uplink, as on Arch and many servers, proving the ``networkd`` plugin
and the core's live switch under a real systemd.

1. boot 1: plain Linux (ifupdown, as the image is).
2. The administrator's own move to networkd: eth0 on DHCP in
   /etc/systemd/network/50-eth0.network, its ifupdown stanza commented out,
   systemd-networkd enabled; reboot: networkd has eth0 routable, and
   ``xenrun facts`` says networkd is the stack in charge.
3. ``xenrun setup --yes`` with ``network = "networkd"`` and a gateway to check
   that does not answer: Xen installed with apt (S6, a run of its own, kept), the
   rest planned again from the package's files; the bridge's switch fails its
   check (no default route through the bridge to that gateway) and puts the old
   network back by itself (the core's revert, under a real
   networkd); xenrun exits 1 with its files put back, the SSH session alive.
   Then ``xenrun setup --yes`` again: the bridge's three files switched live under
   the SSH session (S11).
4. reboot into Xen (once): Domain-0, eth0 a port of xenbr0 which holds the
   address, networkd has xenbr0 routable.
5. a second ``xenrun setup --yes`` has nothing to do.
"""

from __future__ import annotations

import json

from e2e.scenario import Scenario

NO_ONE = "10.0.2.99"  # on the machine's network, no one; and QEMU hands out no router
UPLINK_NETWORK = """# the administrator's own: eth0 on DHCP with systemd-networkd
[Match]
Name=eth0

[Network]
DHCP=ipv4
"""


class NetworkdScenario(Scenario):
    def __init__(self, workdir, progress=None):
        super().__init__(workdir, progress)
        self.network = "networkd"

    def check_stack(self) -> None:
        state = self.sh("networkctl list --no-legend --no-pager xenbr0 eth0")
        self.say("    " + state.replace("\n", "\n    "))
        rows = {line.split()[1]: line.split() for line in state.splitlines() if len(line.split()) >= 4}
        # routable: it has the address (its SETUP column may still say "configuring"
        # while networkd waits on IPv6 autoconfiguration, which QEMU's network answers slowly)
        self.check("routable" in rows.get("xenbr0", []), "networkd has xenbr0 routable", state)
        self.check("enslaved" in rows.get("eth0", []), "networkd has eth0 enslaved to the bridge", state)

    def _steps(self) -> None:
        vm = self.vm
        self.timed("boot", "boot 1: start QEMU, plain Linux, wait for SSH", lambda: (vm.start(), vm.wait_ssh()))
        self.check_linux("boot 1")
        self.check(not self.xen_installed(), "the machine has no Xen (a stock Debian 12)")

        def to_networkd():
            self.sh(f"cat > /etc/systemd/network/50-eth0.network <<'EOF'\n{UPLINK_NETWORK}EOF")
            self.sh("sed -i -e 's/^allow-hotplug eth0/# (networkd now) &/' -e 's/^iface eth0 inet dhcp/# &/'"
                    " /etc/network/interfaces && systemctl enable --quiet systemd-networkd")
        self.timed("step", "the uplink handed to systemd-networkd (by hand, as its administrator)", to_networkd)
        self.timed("boot", "boot 2: reboot with networkd in charge", vm.reboot)
        state = self.sh("networkctl list --no-legend --no-pager eth0")
        self.check("routable" in state.split(), f"networkd has eth0 routable: {state}")
        self.site = self.write_site()
        report, _, _ = self.xenrun("facts", "--format", "json")
        facts = report.get("facts", report)
        self.check(facts.get("network_stack") == "networkd",
                   f"xenrun facts: networkd is in charge ({facts.get('network_stack_why')})")

        plain = self.site.read_text()

        def failing_switch():
            # the safety check wants the default route through the new bridge to this
            # gateway, answering ping: this network has neither
            self.site.write_text(plain.replace("[plugin.networkd]\n", f"[plugin.networkd]\ngateway = \"{NO_ONE}\"\n"
                                               "timeout = 15\n"))
            _, _, err = self.xenrun("setup", "--yes", expect=1)
            self.site.write_text(plain)
            self.say(f"    xenrun: {(err.strip().splitlines() or [''])[-1][:400]}")
            self.check(self.xen_installed(), "S6 installed xen-system-amd64 with apt (from the served repository),"
                       " a run of its own, kept")
            links = {x["ifname"]: x for x in json.loads(self.sh("ip -j link show"))}
            self.check("xenbr0" not in links and not links.get("eth0", {}).get("master"),
                       f"the switch whose check failed (gateway {NO_ONE}, which this network has not) was put"
                       " back by itself:"
                       " no xenbr0, eth0 on its own, and the SSH session is alive", json.dumps(links.get("eth0")))
            state = self.sh("networkctl list --no-legend --no-pager eth0")
            self.check("routable" in state.split(), f"networkd has eth0 routable again: {state}")
            left = self.sh("ls /etc/systemd/network")
            self.check("xenrun" not in left, f"the bridge's files are gone: /etc/systemd/network has {left.split()}")
        self.timed("step", "setup whose bridge check fails (installs Xen; the switch reverts)", failing_switch)

        def setup():
            report, _, _ = self.xenrun("setup", "--yes", "--format", "json")
            self.show_report(report)
            self.check(report["report"]["status"] == "applied", "setup applied its plan")
            self.check_bridge_live()
            self.check_stack()
        self.timed("step", "xenrun setup (networkd bridge)", setup)
        self.timed("boot", "boot 3: reboot into Xen (once)", vm.reboot)
        self.timed("step", "check dom0 after boot 3", lambda: self.check_xen("boot 3"))

        def again():
            report, _, _ = self.xenrun("setup", "--yes", "--format", "json")
            self.check(report["report"]["status"] == "nothing to do" and report["summary"]["changed"] == 0,
                       f"a second setup reports nothing to do ({report['summary']['unchanged']} unchanged)",
                       json.dumps([i for i in report["plan"] if i["result"] != "unchanged"], indent=1)[:3000])
        self.timed("step", "xenrun setup again", again)
