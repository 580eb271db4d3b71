"""mitmproxy face: load axme-fw into plain mitmdump or mitmproxy:

    mitmdump -s addon/script.py --set axme_rules=rules --set axme_state=state \\
             --set confdir=state --set connection_strategy=lazy

A separate file because mitmproxy loads ``-s`` scripts outside their package (relative
imports and some dataclass machinery fail there): this one only imports the installed
package. Prefer ``axme-fw run``: mitmproxy reloads a ``-s`` script when the file
changes, which drops in-memory state (parked flows, counters not yet flushed).
"""

from axme_fw.firewall import Firewall

addons = [Firewall()]
