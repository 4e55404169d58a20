/*
 * entry.S: the guest's first instruction, linked at CODE_ADDR.
 *
 * The VMM enters here in 64-bit mode at CPL3 with RSP = top of this vCPU's
 * stack and RDI = vCPU index. Align the stack as the SysV ABI expects at a
 * call site, call guest_main(vcpu), and spin if it ever returns. Never HLT:
 * it faults at CPL3 and there is no IDT.
 */
	.section .text.entry, "ax", @progbits
	.code64
	.globl _start
	.type _start, @function
_start:
	xorl %ebp, %ebp
	andq $-16, %rsp
	call guest_main
1:	jmp 1b
	.size _start, . - _start

	.section .note.GNU-stack, "", @progbits
