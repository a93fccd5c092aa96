#!/usr/bin/env python3
"""Lists public/open declarations without a `///` doc comment: python3 scripts/undocumented.py [DIR...]"""
import os, re, sys
decl = re.compile(r'^\s*(?:@[\w().:, "]+\s+)*(?:(?:nonisolated|final|static|class|override|required|convenience|mutating|indirect|dynamic|lazy)\s+)*(public|open)\s+(?:(?:nonisolated|final|static|class|override|required|convenience|mutating|indirect|dynamic|lazy|private\(set\)|package\(set\)|internal\(set\))\s+)*(func|var|let|init|subscript|class|struct|enum|protocol|actor|typealias|case|static|extension)\b')
total = missing = 0
for root in sys.argv[1:] or ['Sources']:
    for d, _, fs in os.walk(root):
        for f in sorted(fs):
            if not f.endswith('.swift'): continue
            p = os.path.join(d, f)
            lines = open(p).read().split('\n')
            for i, l in enumerate(lines):
                m = decl.match(l)
                if not m or m.group(2) == 'extension': continue
                total += 1
                j = i - 1
                # attributes and `// @unchecked:` / `// SAFETY:` notes may sit between the doc comment and the declaration
                while j >= 0 and (re.match(r'^\s*@', lines[j]) or re.match(r'^\s*//(?!/)', lines[j])): j -= 1
                if j >= 0 and re.match(r'^\s*(///|\*/|\*)', lines[j]): continue
                # protocol conformance requirements documented at the protocol count as documented
                if re.search(r'\b(description|debugDescription|hash\(into|==|rawValue|init\(rawValue|makeAsyncIterator|next\(\)|makeIterator)\b', l): continue
                missing += 1
                print(f'{p}:{i+1}: {l.strip()}')
print(f'{missing} of {total} public declarations undocumented', file=sys.stderr)
